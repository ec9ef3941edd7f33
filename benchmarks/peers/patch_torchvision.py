"""Makes PyPI's torchvision importable beside a CPU torch in a peer's virtual environment (run with that venv's
python): its wheel is a CUDA build without the nms/qnms ops, so `import torchvision` fails with "operator
torchvision::nms does not exist". Each `@torch.library.register_fake("torchvision::nms")` (and qnms) in
_meta_registrations.py is made to register only when the ops exist (the module imports torchvision.extension before
those lines). Idempotent."""

import importlib.util
import pathlib
import re

MARKER = "# patched by benchmarks/peers/patch_torchvision.py"

spec = importlib.util.find_spec("torchvision")
if spec is None:
    print("torchvision not installed: nothing to patch")
    raise SystemExit
path = pathlib.Path(spec.origin).parent / "_meta_registrations.py"
text = path.read_text()
if MARKER in text:
    print(f"{path}: already patched")
    raise SystemExit
new, n = re.subn(
    r'^(\s*)@((?:[\w.]+\.)?register_fake)\("torchvision::(nms|qnms)"\)[ \t]*$',
    lambda m: (f'{m.group(1)}@({m.group(2)}("torchvision::{m.group(3)}") '
               f'if __import__("torchvision").extension._has_ops() else (lambda f: f))  {MARKER}'),
    text, flags=re.M)
if n == 0:
    print(f"{path}: no nms/qnms register_fake found, left as is")
else:
    path.write_text(new)
    print(f"{path}: {n} registrations made conditional on torchvision.extension._has_ops()")
