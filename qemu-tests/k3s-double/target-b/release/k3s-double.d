/work/main/qemu-tests/k3s-double/target-b/release/k3s-double: /work/main/qemu-tests/k3s-double/src/main.rs
