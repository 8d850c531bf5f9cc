"""The bounds every interface holds a generation to (CLI, server, trajectory files).

A module of plain numbers, so that the command line can check its options without
importing torch or diffusers.
"""

MAX_STEPS = 500  # the most steps any trajectory may have; a schedule may allow fewer (schedulers.max_steps)
SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 64 - 1  # what torch.Generator.manual_seed takes
MAX_GUIDANCE = 100.0
