.PHONY: check test install

install:
	python -m pip install -e '.[dev]'

check:
	scripts/check

test:
	python -m pytest -q
