"""The layers depend only downward (DESIGN.md, "One home per model family"), checked on the imports of every
top-level script, every module under model/, data/ and training/, and every bench/ script (read with ast, nothing is
imported):

- no module imports a script (the top-level *.py files other than megatransformer_utils.py);
- a bench/ script imports no other bench/ script, only bench/common.py (what they share) and the library;
- only pretrain_*.py import task modules (training/*_task.py and training/language_modeling.py);
- model/ imports nothing from data/ or training/; data/ nothing from training/;
- megatransformer_utils.py (the config machinery under everything) imports none of model/, data/, training/.
"""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LIBRARY = "megatransformer_utils"
PACKAGES = ("model", "data", "training")
BENCH, BENCH_LIBRARY = "bench", "bench.common"
TASK_MODULES = ("training.language_modeling",)  # task modules whose names do not end in _task


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path) -> set[str]:
    """Every module `path` imports, anywhere in the file: `import a.b` gives a.b; `from a.b import c` gives a.b and
    a.b.c (c may be a module); relative imports are resolved against the file's package."""
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else [])) \
                if node.level else node.module
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def is_task_module(name: str) -> bool:
    return (name.startswith("training.") and name.endswith("_task")) or name in TASK_MODULES


def layering_violations(root: Path) -> list[str]:
    """One line per import that breaks a rule of the module docstring, for the repository at `root`."""
    scripts = {path.stem for path in root.glob("*.py") if path.stem != LIBRARY}
    bench_scripts = {module_name(path, root) for path in (root / BENCH).glob("*.py")} - {BENCH_LIBRARY}
    files = sorted(root.glob("*.py")) + sorted(path for package in PACKAGES + (BENCH,)
                                               for path in (root / package).rglob("*.py"))
    violations = []
    for path in files:
        importer = module_name(path, root)
        layer = importer.split(".")[0]
        for imported in sorted(imported_modules(path, root)):
            top = imported.split(".")[0]
            if top in scripts:
                violations.append(f"{importer} imports the script {top}.py: move what it shares into a library module")
            # a bench script run as `python bench/x.py` also finds its neighbours as top-level modules
            bench_script = imported if imported in bench_scripts else f"{BENCH}.{top}" \
                if layer == BENCH and f"{BENCH}.{top}" in bench_scripts else None
            if bench_script and bench_script != importer:
                violations.append(f"{importer} imports the bench script {bench_script}: move what it shares into "
                                  f"{BENCH_LIBRARY} or a library module")
            if is_task_module(imported) and not importer.startswith("pretrain_"):
                violations.append(f"{importer} imports the task module {imported}: only pretrain_*.py may")
            if layer == "model" and top in ("data", "training"):
                violations.append(f"{importer} (model/) imports {imported}: model/ must not depend on {top}/")
            if layer == "data" and top == "training":
                violations.append(f"{importer} (data/) imports {imported}: data/ must not depend on training/")
            if layer == LIBRARY and top in PACKAGES:
                violations.append(f"{importer} imports {imported}: the config machinery must not depend on {top}/")
    return sorted(set(violations))


def test_the_repository_keeps_its_layers():
    assert layering_violations(REPO) == []


def test_the_checker_finds_each_kind_of_violation(tmp_path):
    files = {
        "megatransformer_utils.py": "from model.vae import VAE\n",
        "vocode.py": "import torch\n",
        "evaluate_vocoder.py": "from vocode import synthesize\n",
        "generate_image.py": "def main():\n    from training.image_diffusion_task import sample_grid\n",
        "pretrain_wm.py": "from training.language_modeling import build_lm_task\nfrom training import vocoder_task\n",
        "preprocess_text_dataset.py": "from training.language_modeling import lm_loss\n",
        "model/__init__.py": "",
        "model/vae.py": "from data.sharded_cache import ShardedCache\n",
        "model/image/pipeline.py": "from ...training import checkpoints\n",
        "data/__init__.py": "",
        "data/cli.py": "import training.cli\nfrom . import sharded_cache\n",
        "training/__init__.py": "",
        "training/vocoder_task.py": "from data.sharded_cache import ShardedCache\n",
        "training/loop.py": "from .image_vae_task import build_image_vae_task\n",
        "bench/common.py": "import torch\n",
        "bench/caption_fidelity.py": "import generate_image\nfrom bench.common import interleaved_times\n",
        "bench/wm_shapes_eval.py": "from caption_fidelity import classify_colors\nimport pretrain_wm\n",
        "bench/dit_speed.py": "from bench.caption_fidelity import score\nfrom training import vocoder_task\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    found = layering_violations(tmp_path)
    expected = [
        "data.cli (data/) imports training.cli: data/ must not depend on training/",
        "evaluate_vocoder imports the script vocode.py: move what it shares into a library module",
        "generate_image imports the task module training.image_diffusion_task: only pretrain_*.py may",
        "megatransformer_utils imports model.vae: the config machinery must not depend on model/",
        "model.image.pipeline (model/) imports training: model/ must not depend on training/",
        "model.vae (model/) imports data.sharded_cache: model/ must not depend on data/",
        "preprocess_text_dataset imports the task module training.language_modeling: only pretrain_*.py may",
        "training.loop imports the task module training.image_vae_task: only pretrain_*.py may",
        "bench.caption_fidelity imports the script generate_image.py: move what it shares into a library module",
        "bench.wm_shapes_eval imports the script pretrain_wm.py: move what it shares into a library module",
        "bench.wm_shapes_eval imports the bench script bench.caption_fidelity: move what it shares into bench.common "
        "or a library module",
        "bench.dit_speed imports the bench script bench.caption_fidelity: move what it shares into bench.common or a "
        "library module",
        "bench.dit_speed imports the task module training.vocoder_task: only pretrain_*.py may",
    ]
    for line in expected:
        assert line in found, (line, found)
    # pretrain_*.py may import task modules (also as `from training import vocoder_task`); a task may import data/
    assert not [line for line in found if line.startswith(("pretrain_wm", "training.vocoder_task", "vocode "))]
    # bench/common.py is what bench scripts share
    assert not [line for line in found if "bench.common" in line.split(":")[0]]
    assert "model.image.pipeline (model/) imports training.checkpoints: model/ must not depend on training/" in found
