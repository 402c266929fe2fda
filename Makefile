.PHONY: install test quality demo bench

install:
	pip install torch==2.13.0 -e ".[dev]"

test:
	python -m pytest -q

quality:
	ruff check src tests benchmarks
	duplicates --change || true

demo:
	medtune pipeline --output_dir outputs/pipeline

bench:
	python benchmarks/train_throughput.py --stage pt
