"""The demo on the embedded family: cloud then edge, an image grid and the cost table."""

from __future__ import annotations

from pathlib import Path

from ..core.plan import parse_plan
from ..eval import default_evaluator
from ..io import atomic_save_image
from ..world import prompt_set
from .batch import decode_many, run_many
from .pipeline import load_pipeline
from .report import print_cost_table

DEMO_PLAN = "cloud:10,edge:15"


def hybrid_demo(out: Path, n: int = 8) -> None:
    from ..core.runner import to_pil
    from ..grid import image_grid

    plan = parse_plan(DEMO_PLAN)
    pipe = load_pipeline({"cloud": "cloud", "edge": "edge"}, "vae")
    prompts = prompt_set(n, seed=7)
    images, _ = decode_many(pipe.vae, run_many(pipe, prompts, plan, size=64).latents)
    scores, mean = default_evaluator().adherence(images, prompts)
    atomic_save_image(image_grid(to_pil(images), rows=2, cols=(n + 1) // 2, cell=128, lines=3,
                                 captions=[f"{s:.2f} {p}" for s, p in zip(scores, prompts)]),
                      out / "hybrid_grid.png")
    for p, s in zip(prompts, scores):
        print(f"{s:.2f}  {p}")
    print(f"plan {DEMO_PLAN}: mean adherence {mean:.3f}; wrote {out / 'hybrid_grid.png'}")

    traj = pipe.start(prompts[0], seed=0)
    pipe.run(traj, plan)
    image = pipe.decode(traj)
    atomic_save_image(image, out / "hybrid.png")
    print(f"one generation of {prompts[0]!r}:")
    print_cost_table(traj, {"decode": f"{pipe.timings['decode']:.3f}"})
