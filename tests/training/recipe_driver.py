"""Runs the tiny VITA-Audio recipe in a fresh process and SIGKILLs it at a chosen point.

Usage: ``python recipe_driver.py OUT_DIR [KILL [KEY=VALUE ...]]`` with KILL empty or one of

* ``save:<stage>:<step>:<file>``: while checkpoint ``<step>`` of ``<stage>`` is being written,
  after half of ``<file>`` (e.g. ``optimizer.pt``) reached the disk;
* ``saved:<stage>:<step>``: right after checkpoint ``<step>`` of ``<stage>`` was published;
* ``begin:<stage>``: when ``<stage>`` starts training (the previous stage's final exists);
* ``export:<stage>``: when ``<stage>``'s final folder is written but not yet published.

Used by test_resume.py; the recipe is examples/vita_audio/recipes/tiny.yaml with RECIPE_OVERRIDES.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))

RECIPE_OVERRIDES = ["run.progress=false", "run.report_to=none"]


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    import torch
    from transformers import TrainerCallback
    from vita_audio.config import load_config
    from vita_audio.train import main as train

    out, kill = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "")
    extra = sys.argv[3:]
    cfg = load_config(
        ROOT / "examples/vita_audio/recipes/tiny.yaml",
        [f"run.out_dir={out}", *RECIPE_OVERRIDES, *extra],
    )
    kind, *where = kill.split(":") if kill else ("",)

    class Killer(TrainerCallback):
        def stage(self, args):
            return int(Path(args.output_dir).name.removeprefix("stage"))

        def on_train_begin(self, args, state, control, **kw):
            if kind == "begin" and self.stage(args) == int(where[0]):
                _die()

        def on_save(self, args, state, control, **kw):
            if kind == "saved" and (self.stage(args), state.global_step) == (
                int(where[0]),
                int(where[1]),
            ):
                _die()

        def on_step_end(self, args, state, control, **kw):
            if kind != "save" or self.stage(args) != int(where[0]):
                return
            if state.global_step + 0 != int(where[1]):
                return
            real = torch.save

            def partial_save(obj, f, *a, **k):
                if str(f).endswith(where[2]):
                    real(obj, f, *a, **k)
                    size = os.path.getsize(f)
                    with open(f, "r+b") as fh:
                        fh.truncate(size // 2)
                    _die()
                return real(obj, f, *a, **k)

            torch.save = partial_save

    if kind == "export":
        import vita_audio.train as recipe

        real_publish = recipe.publish

        def publish(staged, final):
            if Path(final).parent.name == f"stage{where[0]}":
                _die()
            real_publish(staged, final)

        recipe.publish = publish
    train(cfg, callbacks=[Killer()])
    print("DONE")


if __name__ == "__main__":
    main()
