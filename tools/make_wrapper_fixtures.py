"""Regenerate fixtures/torch_wrappers/: ncps layers inside users' modules, saved the ways people
save them (needs torch, ncps and, for the Lightning checkpoint, lightning).

    python tools/make_wrapper_fixtures.py [--out fixtures]

Writes, each with NAME.npz holding the inputs and the torch module's outputs:
  wrapper.pt            state_dict() of Wrapper: a conv over the sequence, a static branch
                        (Linear, BatchNorm1d, ReLU, Linear) whose output joins every step, a CfC
                        (seq_model) and a head (Linear, Tanh, Linear)
  wrapper_dataparallel.pt   the same module's state dict through nn.DataParallel ("module.")
  wrapper_compiled.pt       ... through torch.compile ("_orig_mod.")
  lightning.ckpt        a Lightning Trainer's checkpoint of a LightningModule holding an LTC
                        (rnn) and a Linear head, after a few training steps
  training_two_rnns.pt  {"model_state_dict", "optimizer_state_dict", "epoch", "loss"} of
                        Seq2Seq: an LTC encoder (AutoNCP) and a mixed-memory wired CfC decoder
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import ncps.torch as ncps_torch
import ncps.wirings as ncps_wirings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import perturb_  # noqa: E402

BATCH, STEPS, FEATURES, STATIC = 3, 10, 4, 6


class Wrapper(nn.Module):
    """(x (B, T, 4), s (B, 6)) -> (B, T, 2)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(FEATURES, 5, kernel_size=3, padding=1)
        self.static_net = nn.Sequential(nn.Linear(STATIC, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 8))
        self.seq_model = ncps_torch.CfC(13, 16, backbone_units=24, backbone_layers=2, return_sequences=True)
        self.head = nn.Sequential(nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 2))

    def forward(self, x, s):
        features = self.conv(x.transpose(1, 2)).transpose(1, 2)
        static = self.static_net(s)[:, None, :].expand(-1, x.shape[1], -1)
        out, _ = self.seq_model(torch.cat([features, static], dim=-1))
        return self.head(out)


class Seq2Seq(nn.Module):
    """x (B, T, 4) -> (B, T, 2): an LTC encoder's sequence, bridged, into a CfC decoder."""

    def __init__(self):
        super().__init__()
        self.encoder = ncps_torch.LTC(FEATURES, ncps_wirings.AutoNCP(12, 5, seed=1), return_sequences=True)
        self.bridge = nn.Linear(5, 6)
        self.decoder = ncps_torch.CfC(6, ncps_wirings.AutoNCP(10, 2, seed=2), mixed_memory=True, return_sequences=True)

    def forward(self, x):
        encoded, _ = self.encoder(x)
        out, _ = self.decoder(torch.tanh(self.bridge(encoded)))
        return out


def wrapper_fixtures(out_dir: Path, rng):
    torch.manual_seed(0)
    model = Wrapper()
    perturb_(model, 10)
    # Running statistics that are not the initial ones, as after training.
    model.static_net[1].running_mean.normal_(0, 0.5)
    model.static_net[1].running_var.uniform_(0.5, 2.0)
    model.static_net[1].num_batches_tracked.fill_(42)
    model.eval()
    x = rng.normal(size=(BATCH, STEPS, FEATURES)).astype(np.float32)
    s = rng.normal(size=(BATCH, STATIC)).astype(np.float32)
    with torch.no_grad():
        out = model(torch.from_numpy(x), torch.from_numpy(s)).numpy()
    arrays = {"x": x, "s": s, "output": out}
    torch.save(model.state_dict(), out_dir / "wrapper.pt")
    np.savez(out_dir / "wrapper.npz", **arrays)
    torch.save(nn.DataParallel(model).state_dict(), out_dir / "wrapper_dataparallel.pt")
    np.savez(out_dir / "wrapper_dataparallel.npz", **arrays)
    torch.save(torch.compile(model).state_dict(), out_dir / "wrapper_compiled.pt")
    np.savez(out_dir / "wrapper_compiled.npz", **arrays)


def lightning_fixture(out_dir: Path, rng):
    import lightning

    class Regressor(lightning.LightningModule):
        def __init__(self, units: int = 8, lr: float = 0.01):
            super().__init__()
            self.save_hyperparameters()
            self.rnn = ncps_torch.LTC(FEATURES, units, return_sequences=True)
            self.head = nn.Linear(units, 1)

        def forward(self, x):
            out, _ = self.rnn(x)
            return self.head(out)

        def training_step(self, batch, _):
            x, y = batch
            return nn.functional.mse_loss(self(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    torch.manual_seed(1)
    x_train = torch.from_numpy(rng.normal(size=(16, STEPS, FEATURES)).astype(np.float32))
    y_train = torch.sin(x_train.sum(-1, keepdim=True))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_train, y_train), batch_size=8)
    model = Regressor()
    trainer = lightning.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(out_dir),
    )
    trainer.fit(model, loader)
    trainer.save_checkpoint(out_dir / "lightning.ckpt")
    model.eval()
    x = rng.normal(size=(BATCH, STEPS, FEATURES)).astype(np.float32)
    with torch.no_grad():
        out = model(torch.from_numpy(x)).numpy()
    np.savez(out_dir / "lightning.npz", x=x, output=out)


def training_dict_fixture(out_dir: Path, rng):
    torch.manual_seed(2)
    model = Seq2Seq()
    perturb_(model, 20)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.from_numpy(rng.normal(size=(BATCH, STEPS, FEATURES)).astype(np.float32))
    loss = model(x).pow(2).mean()
    loss.backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        out = model(x).numpy()
    checkpoint = {
        "epoch": 7,
        "model_state_dict": model.state_dict(),
        "optimizer_state_dict": optimizer.state_dict(),
        "loss": float(loss),
    }
    torch.save(checkpoint, out_dir / "training_two_rnns.pt")
    np.savez(out_dir / "training_two_rnns.npz", x=x.numpy(), output=out)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "fixtures"))
    args = parser.parse_args()
    out_dir = Path(args.out) / "torch_wrappers"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    rng = np.random.default_rng(7)
    wrapper_fixtures(out_dir, rng)
    lightning_fixture(out_dir, rng)
    training_dict_fixture(out_dir, rng)
    for stray in out_dir.glob("lightning_logs"):
        shutil.rmtree(stray)
    total = sum(p.stat().st_size for p in out_dir.iterdir())
    print(f"{len(list(out_dir.glob('*.npz')))} fixtures, {total / 1024:.0f} KiB in {out_dir}")


if __name__ == "__main__":
    main()
