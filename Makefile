.PHONY: check test install

install:
	scripts/install dev

check:
	scripts/check

test:
	python -m pytest -q
