"""Sparse wirings for NCP models: ``Wiring``, ``FullyConnected``, ``Random``, ``NCP``, ``AutoNCP``.

A wiring describes which neurons talk to which. ``adjacency_matrix`` is (units, units) and
``sensory_adjacency_matrix`` is (input_dim, units), indexed [source, destination], with entries
-1 (inhibitory), +1 (excitatory) or 0 (no synapse). Neuron ids put the motor (output) neurons
first.

The random draws are the reference's (``ncps.wirings`` 1.0.1) call for call, so the same seed
gives bit-identical matrices. Where the reference is buggy we keep its random stream and fix
what can be fixed without changing the matrices (see ``NCP.get_config``).

One deliberate difference: ``build`` draws the sensory synapses once. The reference draws them
again on every ``build`` call with the same input size (adding a second random set of synapses
to an already built wiring); here a second call is a no-op.

Pure numpy: no MLX import, so a wiring can be built and inspected anywhere.
"""

from __future__ import annotations

import numpy as np

from .arguments import check_int

__all__ = [
    "Wiring",
    "FullyConnected",
    "Random",
    "NCP",
    "AutoNCP",
    "wiring_from_config",
    "describe",
    "wiring_from_description",
]


class Wiring:
    """A wiring of ``units`` neurons given explicitly by its adjacency matrices.

    Subclasses fill the matrices from a seed; ``Wiring`` itself is the plain container used to
    rebuild any wiring from its matrices (``Wiring.from_config``).
    """

    def __init__(self, units: int, layers: list[list[int]] | None = None):
        self.units = check_int("units", units)
        self.adjacency_matrix = np.zeros([self.units, self.units], dtype=np.int32)
        self.sensory_adjacency_matrix = None
        self.input_dim = None
        self.output_dim = None
        # Neuron ids per layer, input side first; None means one layer of all neurons. Only
        # a plain Wiring rebuilt from a layered one (e.g. an NCP's exact description) sets it.
        self.layers = [list(map(int, layer)) for layer in layers] if layers is not None else None

    @property
    def num_layers(self) -> int:
        return 1 if self.layers is None else len(self.layers)

    def get_neurons_of_layer(self, layer_id: int) -> list[int]:
        if self.layers is None:
            return list(range(self.units))
        return self.layers[layer_id]

    def is_built(self) -> bool:
        return self.input_dim is not None

    def build(self, input_dim: int) -> None:
        """Fix the number of input features and draw the sensory synapses (once)."""
        input_dim = int(input_dim)
        if self.input_dim is not None and self.input_dim != input_dim:
            # Reference quirk (upstream issue 75): a wiring remembers its input size, so one
            # object cannot serve two layers. Keep the check, say what to do about it.
            raise ValueError(
                f"Conflicting input dimensions: this {type(self).__name__} wiring was built for "
                f"{self.input_dim} input features but is now used with {input_dim}. A wiring "
                "object belongs to one layer; create a separate wiring for each layer."
            )
        if self.input_dim is None:
            self.set_input_dim(input_dim)
            self._build_sensory()

    def _build_sensory(self) -> None:
        """Draw sensory synapses after ``set_input_dim``; nothing to draw for a plain Wiring."""

    def erev_initializer(self, shape=None, dtype=None) -> np.ndarray:
        return np.copy(self.adjacency_matrix)

    def sensory_erev_initializer(self, shape=None, dtype=None) -> np.ndarray:
        return np.copy(self.sensory_adjacency_matrix)

    def set_input_dim(self, input_dim: int) -> None:
        self.input_dim = int(input_dim)
        self.sensory_adjacency_matrix = np.zeros([self.input_dim, self.units], dtype=np.int32)

    def set_output_dim(self, output_dim: int) -> None:
        self.output_dim = int(output_dim)

    def get_type_of_neuron(self, neuron_id: int) -> str:
        return "motor" if neuron_id < self.output_dim else "inter"

    def add_synapse(self, src: int, dest: int, polarity: int) -> None:
        if src < 0 or src >= self.units:
            raise ValueError(f"Cannot add synapse originating in {src} if cell has only {self.units} units")
        if dest < 0 or dest >= self.units:
            raise ValueError(f"Cannot add synapse feeding into {dest} if cell has only {self.units} units")
        if polarity not in (-1, 1):
            raise ValueError(f"Cannot add synapse with polarity {polarity} (expected -1 or +1)")
        self.adjacency_matrix[src, dest] = polarity

    def add_sensory_synapse(self, src: int, dest: int, polarity: int) -> None:
        if self.input_dim is None:
            raise ValueError("Cannot add sensory synapses before build() has been called")
        if src < 0 or src >= self.input_dim:
            raise ValueError(
                f"Cannot add sensory synapse originating in {src} if input has only {self.input_dim} features"
            )
        if dest < 0 or dest >= self.units:
            raise ValueError(f"Cannot add synapse feeding into {dest} if cell has only {self.units} units")
        if polarity not in (-1, 1):
            raise ValueError(f"Cannot add synapse with polarity {polarity} (expected -1 or +1)")
        self.sensory_adjacency_matrix[src, dest] = polarity

    @property
    def synapse_count(self) -> int:
        """Number of synapses between the wiring's own neurons."""
        return int(np.sum(np.abs(self.adjacency_matrix)))

    @property
    def sensory_synapse_count(self) -> int:
        """Number of synapses from the input features (sensory neurons) to the neurons."""
        if self.sensory_adjacency_matrix is None:
            return 0
        return int(np.sum(np.abs(self.sensory_adjacency_matrix)))

    def get_config(self) -> dict:
        """The exact wiring: matrices, sizes and layers. ``Wiring.get_config(any_wiring)`` gives
        a seed-free description that ``Wiring.from_config`` rebuilds with the same layers."""
        return {
            "units": self.units,
            "adjacency_matrix": self.adjacency_matrix.tolist(),
            "sensory_adjacency_matrix": None
            if self.sensory_adjacency_matrix is None
            else self.sensory_adjacency_matrix.tolist(),
            "input_dim": self.input_dim,
            "output_dim": self.output_dim,
            "layers": [[int(n) for n in self.get_neurons_of_layer(i)] for i in range(self.num_layers)],
        }

    @classmethod
    def from_config(cls, config: dict) -> "Wiring":
        wiring = Wiring(config["units"], layers=config.get("layers"))
        wiring.adjacency_matrix = np.asarray(config["adjacency_matrix"], dtype=np.int32)
        if config.get("sensory_adjacency_matrix") is not None:
            wiring.sensory_adjacency_matrix = np.asarray(config["sensory_adjacency_matrix"], dtype=np.int32)
        wiring.input_dim = config.get("input_dim")
        wiring.output_dim = config.get("output_dim")
        if wiring.adjacency_matrix.shape != (wiring.units, wiring.units):
            raise ValueError(
                f"Wiring config: adjacency_matrix has shape {wiring.adjacency_matrix.shape}, expected "
                f"({wiring.units}, {wiring.units})"
            )
        if wiring.sensory_adjacency_matrix is not None and wiring.sensory_adjacency_matrix.shape != (
            wiring.input_dim,
            wiring.units,
        ):
            raise ValueError(
                f"Wiring config: sensory_adjacency_matrix has shape {wiring.sensory_adjacency_matrix.shape}, "
                f"expected ({wiring.input_dim}, {wiring.units})"
            )
        return wiring

    def get_graph(self, include_sensory_neurons: bool = True):
        """The wiring as a ``networkx.DiGraph`` (needs the optional ``networkx`` package).

        Nodes are ``neuron_i`` (attribute ``neuron_type``: motor/command/inter) and, with
        ``include_sensory_neurons``, ``sensory_i``; edges carry ``polarity``
        ("excitatory"/"inhibitory").
        """
        if not self.is_built():
            raise ValueError(
                "Wiring is not built yet: the number of input features is unknown. "
                "Call wiring.build(input_dim) or pass the wiring to a model with input_size."
            )
        import networkx as nx

        graph = nx.DiGraph()
        for i in range(self.units):
            graph.add_node(f"neuron_{i}", neuron_type=self.get_type_of_neuron(i))
        if include_sensory_neurons:
            for i in range(self.input_dim):
                graph.add_node(f"sensory_{i}", neuron_type="sensory")
            for src, dest in zip(*np.nonzero(self.sensory_adjacency_matrix)):
                polarity = "excitatory" if self.sensory_adjacency_matrix[src, dest] >= 0 else "inhibitory"
                graph.add_edge(f"sensory_{src}", f"neuron_{dest}", polarity=polarity)
        for src, dest in zip(*np.nonzero(self.adjacency_matrix)):
            polarity = "excitatory" if self.adjacency_matrix[src, dest] >= 0 else "inhibitory"
            graph.add_edge(f"neuron_{src}", f"neuron_{dest}", polarity=polarity)
        return graph

    def draw_graph(self, layout="shell", neuron_colors=None, synapse_colors=None, draw_labels=False):
        """Draw the wiring on the current matplotlib axes; returns legend handles.

        Needs the optional ``networkx`` and ``matplotlib`` packages. ``layout`` is one of
        kamada, circular, random, shell, spring, spectral, spiral.
        """
        import matplotlib.patches as mpatches
        import networkx as nx

        if isinstance(synapse_colors, str):
            synapse_colors = {"excitatory": synapse_colors, "inhibitory": synapse_colors}
        elif synapse_colors is None:
            synapse_colors = {"excitatory": "tab:green", "inhibitory": "tab:red"}
        colors = {"inter": "tab:blue", "command": "tab:cyan", "motor": "tab:orange", "sensory": "tab:olive"}
        colors.update(neuron_colors or {})

        layouts = {
            "kamada": nx.kamada_kawai_layout,
            "circular": nx.circular_layout,
            "random": nx.random_layout,
            "shell": nx.shell_layout,
            "spring": nx.spring_layout,
            "spectral": nx.spectral_layout,
            "spiral": nx.spiral_layout,
        }
        if layout not in layouts:
            raise ValueError(f"Unknown layout '{layout}', use one of {sorted(layouts)}")
        graph = self.get_graph()
        pos = layouts[layout](graph)
        for node, data in graph.nodes(data=True):
            nx.draw_networkx_nodes(graph, pos, [node], node_color=colors.get(data["neuron_type"], "tab:blue"))
        if draw_labels:
            nx.draw_networkx_labels(graph, pos)
        for src, dest, data in graph.edges(data=True):
            nx.draw_networkx_edges(graph, pos, [(src, dest)], edge_color=synapse_colors[data["polarity"]])
        present = {data["neuron_type"] for _, data in graph.nodes(data=True)}
        return [
            mpatches.Patch(color=color, label=f"{kind.capitalize()} neurons")
            for kind, color in colors.items()
            if kind in present
        ]

    def save_graph(self, path, figsize=(6, 4), dpi=120, **draw_kwargs) -> None:
        """Draw the wiring (see ``draw_graph``) and save it as an image, e.g. a PNG."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=figsize)
        try:
            handles = self.draw_graph(**draw_kwargs)
            plt.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0))
            plt.axis("off")
            fig.savefig(path, dpi=dpi, bbox_inches="tight")
        finally:
            plt.close(fig)


class FullyConnected(Wiring):
    """Every neuron connects to every neuron (optionally not to itself) and to every input."""

    def __init__(self, units, output_dim=None, erev_init_seed=1111, self_connections=True):
        super().__init__(units)
        self.set_output_dim(units if output_dim is None else output_dim)
        self.self_connections = self_connections
        self.erev_init_seed = erev_init_seed
        self._rng = np.random.default_rng(erev_init_seed)
        for src in range(self.units):
            for dest in range(self.units):
                if src == dest and not self_connections:
                    continue
                self.add_synapse(src, dest, self._rng.choice([-1, 1, 1]))

    def _build_sensory(self):
        for src in range(self.input_dim):
            for dest in range(self.units):
                self.add_sensory_synapse(src, dest, self._rng.choice([-1, 1, 1]))

    def get_config(self):
        return {
            "units": self.units,
            "output_dim": self.output_dim,
            "erev_init_seed": self.erev_init_seed,
            "self_connections": self.self_connections,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)


class Random(Wiring):
    """Randomly drops a ``sparsity_level`` fraction of the synapses of a fully connected wiring."""

    def __init__(self, units, output_dim=None, sparsity_level=0.0, random_seed=1111):
        super().__init__(units)
        self.set_output_dim(units if output_dim is None else output_dim)
        if sparsity_level < 0.0 or sparsity_level >= 1.0:
            raise ValueError(f"Invalid sparsity level '{sparsity_level}', expected value in range [0, 1)")
        self.sparsity_level = sparsity_level
        self.random_seed = random_seed
        self._rng = np.random.default_rng(random_seed)

        count = int(np.round(self.units * self.units * (1 - sparsity_level)))
        candidates = [(src, dest) for src in range(self.units) for dest in range(self.units)]
        for src, dest in self._rng.choice(candidates, size=count, replace=False):
            self.add_synapse(src, dest, self._rng.choice([-1, 1, 1]))

    def _build_sensory(self):
        count = int(np.round(self.input_dim * self.units * (1 - self.sparsity_level)))
        candidates = [(src, dest) for src in range(self.input_dim) for dest in range(self.units)]
        for src, dest in self._rng.choice(candidates, size=count, replace=False):
            # Reference quirk (reference-notes point 8): the polarity is drawn twice and the
            # second draw wins. Both draws are kept so the random stream, and with it every
            # matrix, stays bit-identical to ncps.wirings.Random.
            self._rng.choice([-1, 1, 1])
            self.add_sensory_synapse(src, dest, self._rng.choice([-1, 1, 1]))

    def get_config(self):
        return {
            "units": self.units,
            "output_dim": self.output_dim,
            "sparsity_level": self.sparsity_level,
            "random_seed": self.random_seed,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)


class NCP(Wiring):
    """A four-layer Neural Circuit Policy: sensory -> inter -> command (recurrent) -> motor.

    The state has ``inter_neurons + command_neurons + motor_neurons`` neurons; ids run motor,
    command, inter. Fan-outs and fan-ins are the numbers of synapses drawn per neuron.
    """

    def __init__(
        self,
        inter_neurons,
        command_neurons,
        motor_neurons,
        sensory_fanout,
        inter_fanout,
        recurrent_command_synapses,
        motor_fanin,
        seed=22222,
    ):
        for name, value in (("inter_neurons", inter_neurons), ("command_neurons", command_neurons),
                            ("motor_neurons", motor_neurons), ("sensory_fanout", sensory_fanout),
                            ("inter_fanout", inter_fanout), ("motor_fanin", motor_fanin)):
            check_int(name, value)
        check_int("recurrent_command_synapses", recurrent_command_synapses, 0)
        super().__init__(inter_neurons + command_neurons + motor_neurons)
        self.set_output_dim(motor_neurons)
        self.seed = seed
        self._rng = np.random.RandomState(seed)
        self.num_inter_neurons = inter_neurons
        self.num_command_neurons = command_neurons
        self.num_motor_neurons = motor_neurons
        self.sensory_fanout = sensory_fanout
        self.inter_fanout = inter_fanout
        self.recurrent_command_synapses = recurrent_command_synapses
        self.motor_fanin = motor_fanin

        self.motor_neurons = list(range(0, motor_neurons))
        self.command_neurons = list(range(motor_neurons, motor_neurons + command_neurons))
        self.inter_neurons = list(range(motor_neurons + command_neurons, self.units))

        if motor_fanin > command_neurons:
            raise ValueError(
                f"Motor fanin parameter is {motor_fanin} but there are only {command_neurons} command neurons"
            )
        if sensory_fanout > inter_neurons:
            raise ValueError(
                f"Sensory fanout parameter is {sensory_fanout} but there are only {inter_neurons} inter neurons"
            )
        if inter_fanout > command_neurons:
            raise ValueError(
                f"Inter fanout parameter is {inter_fanout} but there are only {command_neurons} command neurons"
            )

    @property
    def num_layers(self):
        return 3

    def get_neurons_of_layer(self, layer_id):
        layers = {0: self.inter_neurons, 1: self.command_neurons, 2: self.motor_neurons}
        if layer_id not in layers:
            raise ValueError(f"Unknown layer {layer_id}: an NCP has layers 0 (inter), 1 (command), 2 (motor)")
        return layers[layer_id]

    def get_type_of_neuron(self, neuron_id):
        if neuron_id < self.num_motor_neurons:
            return "motor"
        if neuron_id < self.num_motor_neurons + self.num_command_neurons:
            return "command"
        return "inter"

    def _connect_layer(self, sources, targets, fanout, max_fanin, add):
        """Each source gets ``fanout`` random targets; unreached targets then get random sources.

        ``max_fanin`` caps the fan-in of an unreached target; the reference caps the
        inter->command layer by the number of *command* neurons, and we keep that.
        """
        unreached = list(targets)
        for src in sources:
            for dest in self._rng.choice(targets, size=fanout, replace=False):
                if dest in unreached:
                    unreached.remove(dest)
                add(src, dest, self._rng.choice([-1, 1]))
        mean_fanin = int(np.clip(int(len(sources) * fanout / len(targets)), 1, max_fanin))
        for dest in unreached:
            for src in self._rng.choice(sources, size=mean_fanin, replace=False):
                add(src, dest, self._rng.choice([-1, 1]))

    def _build_sensory(self):
        sensory = list(range(self.input_dim))
        self._connect_layer(
            sensory, self.inter_neurons, self.sensory_fanout, len(sensory), self.add_sensory_synapse
        )
        self._connect_layer(
            self.inter_neurons, self.command_neurons, self.inter_fanout, self.num_command_neurons, self.add_synapse
        )
        for _ in range(self.recurrent_command_synapses):
            src = self._rng.choice(self.command_neurons)
            dest = self._rng.choice(self.command_neurons)
            self.add_synapse(src, dest, self._rng.choice([-1, 1]))
        self._connect_command_to_motor()

    def _connect_command_to_motor(self):
        # Drawn per motor neuron (fan-in), then unreached command neurons get a fan-out: the
        # mirror image of _connect_layer, in the reference's draw order.
        unreached = list(self.command_neurons)
        for dest in self.motor_neurons:
            for src in self._rng.choice(self.command_neurons, size=self.motor_fanin, replace=False):
                if src in unreached:
                    unreached.remove(src)
                self.add_synapse(src, dest, self._rng.choice([-1, 1]))
        mean_fanout = int(
            np.clip(
                int(self.num_motor_neurons * self.motor_fanin / self.num_command_neurons),
                1,
                self.num_motor_neurons,
            )
        )
        for src in unreached:
            for dest in self._rng.choice(self.motor_neurons, size=mean_fanout, replace=False):
                self.add_synapse(src, dest, self._rng.choice([-1, 1]))

    def get_config(self):
        # The reference returns the neuron id lists and RandomState.seed() (always None), so its
        # config cannot rebuild the wiring (reference-notes point 8). We store counts and seed.
        return {
            "inter_neurons": self.num_inter_neurons,
            "command_neurons": self.num_command_neurons,
            "motor_neurons": self.num_motor_neurons,
            "sensory_fanout": self.sensory_fanout,
            "inter_fanout": self.inter_fanout,
            "recurrent_command_synapses": self.recurrent_command_synapses,
            "motor_fanin": self.motor_fanin,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("inter_neurons", "command_neurons", "motor_neurons"):
            if isinstance(config.get(key), (list, tuple)):
                config[key] = len(config[key])
        if config.get("seed", 0) is None:
            raise ValueError(
                "This NCP config has seed=None (written by ncps.wirings.NCP.get_config, which loses "
                "the seed), so the wiring cannot be rebuilt from it. Give the wiring's seed, or its "
                "adjacency matrices (Wiring.from_config)."
            )
        return cls(**config)


class AutoNCP(NCP):
    """An NCP sized from the total number of neurons and of outputs.

    ``output_size`` must be less than ``units - 2``; ``sparsity_level`` lies in [0.1, 1.0].
    """

    def __init__(self, units, output_size, sparsity_level=0.5, seed=22222):
        if output_size >= units - 2:
            raise ValueError(
                f"AutoNCP output_size must be less than units - 2 (given {units} units and output_size "
                f"{output_size}); use at least {output_size + 3} units (about 3x output_size works well) "
                "or fewer outputs"
            )
        if sparsity_level < 0.1 or sparsity_level > 1.0:
            raise ValueError(f"AutoNCP sparsity_level must lie in [0.1, 1.0] (given {sparsity_level})")
        self.output_size = output_size
        self.sparsity_level = sparsity_level
        density = 1.0 - sparsity_level
        inter_and_command = units - output_size
        command = max(int(0.4 * inter_and_command), 1)
        inter = inter_and_command - command
        super().__init__(
            inter,
            command,
            output_size,
            sensory_fanout=max(int(inter * density), 1),
            inter_fanout=max(int(command * density), 1),
            recurrent_command_synapses=max(int(command * density * 2), 1),
            motor_fanin=max(int(command * density), 1),
            seed=seed,
        )

    def get_config(self):
        return {
            "units": self.units,
            "output_size": self.output_size,
            "sparsity_level": self.sparsity_level,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)


_CLASSES = {cls.__name__: cls for cls in (Wiring, FullyConnected, Random, NCP, AutoNCP)}


def wiring_from_config(class_name: str, config: dict) -> Wiring:
    """Rebuild a wiring from its class name and ``get_config()`` dict."""
    if class_name not in _CLASSES:
        raise ValueError(f"Unknown wiring class '{class_name}'; expected one of {sorted(_CLASSES)}")
    try:
        return _CLASSES[class_name].from_config(config)
    except TypeError as error:
        raise ValueError(f"Invalid {class_name} wiring config {config}: {error}") from None


def describe(wiring: Wiring) -> dict:
    """``{"class": name, **constructor arguments, "exact": Wiring.get_config(wiring)}``.

    The constructor arguments say what the wiring is; ``exact`` (matrices, sizes, layers)
    rebuilds it without relying on a seed.
    """
    description = {"class": type(wiring).__name__}
    if type(wiring) is not Wiring:
        description.update(wiring.get_config())
    description["exact"] = Wiring.get_config(wiring)
    return description


def wiring_from_description(description: dict) -> Wiring:
    """Inverse of ``describe``; also takes ``{"class": ..., **constructor arguments}`` alone
    (as written in a ``--config`` file), which builds the wiring from its seed."""
    description = dict(description)
    class_name = description.pop("class", None)
    exact = description.pop("exact", None)
    if class_name == "Wiring" or class_name is None:
        if exact is None:
            raise ValueError("A plain Wiring description needs its matrices ('exact')")
        return Wiring.from_config(exact)
    wiring = wiring_from_config(class_name, description)
    if exact is not None:
        restored = Wiring.from_config(exact)
        if restored.units != wiring.units:
            raise ValueError(
                f"Wiring description is inconsistent: {class_name} config has {wiring.units} units, "
                f"its matrices {restored.units}"
            )
        wiring.adjacency_matrix = restored.adjacency_matrix
        wiring.output_dim = restored.output_dim
        if restored.input_dim is not None:
            wiring.set_input_dim(restored.input_dim)
            wiring.sensory_adjacency_matrix = restored.sensory_adjacency_matrix
    return wiring
