# kiln: build, test, bench. `make setup` installs the Debian packages
# the tools and tests need (apt) and builds kiln.

CARGO ?= cargo

.PHONY: setup build test check-examples clean

setup:
	./scripts/setup

build:
	$(CARGO) build --release --locked

# The whole test suite: unit, golden, tool checks, image and VM tests.
test:
	$(CARGO) test --locked --all-targets

check-examples: build
	./target/release/kiln check profiles/club.toml
	./target/release/kiln check profiles/ha.toml

clean:
	$(CARGO) clean
