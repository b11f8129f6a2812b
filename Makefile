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

# The k3s test double (for tests only): builds it and prints its path (in
# its own target dir whatever CARGO_TARGET_DIR says, so the path is right).
K3S_DOUBLE_VERSION ?= v1.31.1+k3s1
.PHONY: k3s-double
k3s-double:
	@K3S_DOUBLE_VERSION=$(K3S_DOUBLE_VERSION) $(CARGO) build -q --release --manifest-path qemu-tests/k3s-double/Cargo.toml --target-dir $(CURDIR)/qemu-tests/k3s-double/target
	@echo $(CURDIR)/qemu-tests/k3s-double/target/release/k3s-double

# Times kiln against the same steps by hand, 1 vs 5 nodes and a config-only
# rebuild, and prints a table (one run each). Not part of `make test`.
.PHONY: bench
bench: build bench-transport
	./scripts/bench

# The tunnel to the hub over UDP and over TCP (kiln-relay), measured in
# network namespaces (root, wireguard-go): a table, and out/bench-transport.json.
.PHONY: bench-transport
bench-transport:
	mkdir -p out
	KILN_BENCH_JSON=$(CURDIR)/out/bench-transport.json $(CARGO) test --release --locked --test transport -- --ignored --nocapture
