"""`python -m mlorc_dist.plan ...`: the per-GPU memory planner (see mlorc_dist.memory.planner)."""
import sys

from .memory.planner import main

if __name__ == "__main__":
    main(sys.argv[1:])
