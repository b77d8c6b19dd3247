# Thin wrappers around ./dev.sh, for people who type `make`.
.PHONY: help demo test bench install

help: ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

demo: ## run the demo (./dev.sh demo)
	./dev.sh demo

test: ## run every check CI runs (./dev.sh test)
	./dev.sh test

bench: ## run the benchmark suite (./dev.sh bench)
	./dev.sh bench

install: ## create .venv with the package and its dev extra
	./dev.sh install
