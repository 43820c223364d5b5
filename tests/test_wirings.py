"""Wirings: bit-identical to ncps.wirings, config round-trips, counts, graphs."""

from __future__ import annotations

import numpy as np
import pytest

from ncps_mlx import wirings

reference = pytest.importorskip("ncps.wirings")

CASES = [
    ("FullyConnected", (16,), {}, 5),
    ("FullyConnected", (10, 4), {"erev_init_seed": 5, "self_connections": False}, 3),
    ("Random", (12, 3), {"sparsity_level": 0.5, "random_seed": 7}, 6),
    ("Random", (30,), {"sparsity_level": 0.9, "random_seed": 1}, 20),
    ("NCP", (10, 8, 4, 4, 3, 5, 3), {"seed": 3}, 7),
    ("NCP", (30, 5, 2, 10, 5, 4, 2), {}, 20),
    ("AutoNCP", (64, 8), {}, 20),
    ("AutoNCP", (20, 5), {"sparsity_level": 0.7, "seed": 99}, 4),
    ("AutoNCP", (32, 4), {"sparsity_level": 0.1, "seed": 12345}, 11),
]


@pytest.mark.parametrize("name,args,kwargs,input_dim", CASES)
def test_bit_identical_to_reference(name, args, kwargs, input_dim):
    ours = getattr(wirings, name)(*args, **kwargs)
    ref = getattr(reference, name)(*args, **kwargs)
    ours.build(input_dim)
    ref.build(input_dim)
    assert ours.adjacency_matrix.dtype == ref.adjacency_matrix.dtype
    assert np.array_equal(ours.adjacency_matrix, ref.adjacency_matrix)
    assert np.array_equal(ours.sensory_adjacency_matrix, ref.sensory_adjacency_matrix)
    assert ours.synapse_count == int(np.abs(ref.adjacency_matrix).sum())
    assert ours.sensory_synapse_count == int(np.abs(ref.sensory_adjacency_matrix).sum())
    assert (ours.units, ours.output_dim, ours.num_layers) == (ref.units, ref.output_dim, ref.num_layers)
    for layer in range(ours.num_layers):
        assert list(ours.get_neurons_of_layer(layer)) == list(ref.get_neurons_of_layer(layer))


@pytest.mark.parametrize("name,args,kwargs,input_dim", CASES)
def test_config_round_trip(name, args, kwargs, input_dim):
    ours = getattr(wirings, name)(*args, **kwargs)
    ours.build(input_dim)
    again = wirings.wiring_from_config(name, ours.get_config())
    again.build(input_dim)
    assert np.array_equal(ours.adjacency_matrix, again.adjacency_matrix)
    assert np.array_equal(ours.sensory_adjacency_matrix, again.sensory_adjacency_matrix)
    plain = wirings.Wiring.from_config(wirings.Wiring.get_config(ours))
    assert np.array_equal(plain.adjacency_matrix, ours.adjacency_matrix)
    assert np.array_equal(plain.sensory_adjacency_matrix, ours.sensory_adjacency_matrix)
    assert plain.output_dim == ours.output_dim and plain.input_dim == input_dim


def test_reference_ncp_config_is_lossy_and_we_say_so():
    ref = reference.NCP(10, 8, 4, 4, 3, 5, 3, seed=3)
    with pytest.raises(Exception):
        reference.NCP.from_config(ref.get_config())  # the reference bug, point 8
    with pytest.raises(ValueError, match="seed=None"):
        wirings.NCP.from_config(ref.get_config())
    fixed = dict(ref.get_config(), seed=3)  # neuron lists are accepted, the seed is what was lost
    ours = wirings.NCP.from_config(fixed)
    ours.build(5)
    # A fresh reference object: the reference's get_config() calls RandomState.seed(), which
    # reseeds the generator from the OS, so `ref` itself can no longer reproduce its seed.
    fresh = reference.NCP(10, 8, 4, 4, 3, 5, 3, seed=3)
    fresh.build(5)
    assert np.array_equal(ours.adjacency_matrix, fresh.adjacency_matrix)
    # Ours does not disturb the random stream.
    again = wirings.NCP(10, 8, 4, 4, 3, 5, 3, seed=3)
    again.get_config()
    again.build(5)
    assert np.array_equal(again.adjacency_matrix, fresh.adjacency_matrix)


def test_build_twice_and_conflicting_input():
    wiring = wirings.AutoNCP(16, 4)
    wiring.build(5)
    before = wiring.sensory_adjacency_matrix.copy(), wiring.adjacency_matrix.copy()
    wiring.build(5)
    assert np.array_equal(before[0], wiring.sensory_adjacency_matrix)
    assert np.array_equal(before[1], wiring.adjacency_matrix)
    with pytest.raises(ValueError, match="separate wiring for each layer"):
        wiring.build(6)


def test_autoncp_rejects_too_many_outputs():
    with pytest.raises(ValueError, match="output_size must be less than units - 2"):
        wirings.AutoNCP(64, 64)
    with pytest.raises(ValueError, match="sparsity_level"):
        wirings.AutoNCP(16, 4, sparsity_level=0.05)


def test_neuron_types_and_graph():
    wiring = wirings.NCP(6, 5, 3, 3, 3, 4, 2, seed=1)
    wiring.build(4)
    assert [wiring.get_type_of_neuron(i) for i in (0, 3, 8)] == ["motor", "command", "inter"]
    networkx = pytest.importorskip("networkx")
    graph = wiring.get_graph()
    assert isinstance(graph, networkx.DiGraph)
    assert graph.number_of_nodes() == 14 + 4
    assert graph.number_of_edges() == wiring.synapse_count + wiring.sensory_synapse_count
    src, dest = map(int, np.argwhere(wiring.adjacency_matrix == -1)[0])
    assert graph.edges[f"neuron_{src}", f"neuron_{dest}"]["polarity"] == "inhibitory"
    assert wirings.NCP(6, 5, 3, 3, 3, 4, 2).get_graph.__doc__
    with pytest.raises(ValueError, match="not built"):
        wirings.AutoNCP(10, 2).get_graph()


def test_save_graph_png(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("networkx")
    wiring = wirings.AutoNCP(12, 3)
    wiring.build(4)
    path = tmp_path / "wiring.png"
    wiring.save_graph(path, draw_labels=True)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 5000
    with pytest.raises(ValueError, match="Unknown layout"):
        wiring.save_graph(tmp_path / "x.png", layout="nope")
