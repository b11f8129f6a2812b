/work/main/qemu-tests/k3s-double/target-b/release/deps/k3s_double-165dd1e27b410be3.d: src/main.rs

/work/main/qemu-tests/k3s-double/target-b/release/deps/k3s_double-165dd1e27b410be3: src/main.rs

src/main.rs:

# env-dep:K3S_DOUBLE_VERSION=v1.31.2+k3s1
