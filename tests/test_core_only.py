"""The plugin works with its core dependencies alone.

- Here: no module of `fim_lightning` imports a package of the study (torchvision, scikit-learn, SciPy, ART,
  TensorBoard, timm, tqdm, `recipes`), and a fresh interpreter trains with the callback (figures on, CSV
  logger), the metric and a penalty, and scores a model white-box, black-box and with the bound.
- `.ci/run` installs the core alone (`pip install .`, no extra) in a fresh venv and runs the same script there
  with FIM_CORE_ONLY=1, which first checks that none of those packages is installed. (In the full venv
  Lightning itself imports SciPy and torchvision when they are present, so only a venv without them proves it.)
"""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUDY = ("torchvision", "sklearn", "scipy", "art", "tensorboard", "tensorboardX", "timm", "tqdm", "recipes",
         "medmnist")

SCRIPT = f'''
import importlib.util, os, sys
if os.environ.get("FIM_CORE_ONLY"):
    present = [name for name in {STUDY!r} if name not in ("recipes", "tqdm")  # tqdm comes with Lightning
               and importlib.util.find_spec(name) is not None]
    assert not present, f"not a core-only environment: {{present}}"
import pytorch_lightning as pl, torch
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
import fim_lightning as fl
from fim_lightning.module import FisherRegularizedClassifier

class Module(FisherRegularizedClassifier):
    def __init__(self):
        super().__init__(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)), 3,
                         penalty=fl.FisherKLPenalty())
        self.val_fim = fl.FisherSpectralNorm()
    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        self.val_fim.update(self.net, batch[0])
        self.log("val_fim", self.val_fim)

torch.manual_seed(0)
gen = torch.Generator().manual_seed(0)
data = TensorDataset(torch.rand(48, 1, 4, 4, generator=gen), torch.arange(48) % 3)
callback = fl.FisherRobustnessCallback(num_samples=8, model_attribute="net")
trainer = pl.Trainer(max_epochs=1, logger=CSVLogger(sys.argv[1]), callbacks=[callback], enable_progress_bar=False,
                     enable_checkpointing=False)
module = Module()
trainer.fit(module, DataLoader(data, batch_size=16), DataLoader(data, batch_size=16))
x = data.tensors[0][:4].double()
net = module.net.double()
exact = fl.fisher_spectral_norm(net, x)
black = fl.blackbox_fisher(lambda z: net(z).softmax(-1), x, num_queries=33, difference="central").spectral_norm
bound = fl.fisher_spectral_bound(net, x).value
# float64, 16 probes span d = 16
assert torch.allclose(black, exact, rtol=1e-4) and (bound >= exact).all(), (exact, black, bound)
assert trainer.callback_metrics["val_fim"] > 0 and len(callback.history) == 1
print("core-only OK", float(exact.mean()))
'''


def test_no_plugin_module_imports_the_study():
    for path in sorted((ROOT / "fim_lightning").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            assert not [n for n in names if n.split(".")[0] in STUDY], (path.name, names)


def test_the_plugin_works_with_the_core_only(tmp_path):
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-4000:]
    assert "core-only OK" in out.stdout
    assert list((tmp_path / "lightning_logs" / "version_0" / "fim").glob("eigenvectors_step*.png"))


if __name__ == "__main__":  # `.ci/run`: python tests/test_core_only.py OUT_DIR, in the core-only venv
    exec(SCRIPT)
