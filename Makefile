# The two commands of the README. Each creates .venv if missing and installs everything first.
.PHONY: setup demo test

setup:
	bash scripts/setup_env.sh

demo: setup
	.venv/bin/python examples/demo.py

test: setup
	OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests
