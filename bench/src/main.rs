//! `bench`: the workload runner that will drive a store of vbuckets with a
//! configurable write and read load while compaction runs, and report
//! throughput, flush latency and the time the flusher waited on compaction. It
//! is not implemented yet: the workload runner arrives in a later issue, and
//! for now this binary only prints a short notice. The micro-benchmarks of the
//! individual crates run with `cargo xtask bench`.

fn main() {
    println!("bench: the workload runner arrives in a later issue.");
    println!("For the micro-benchmarks of the crates, run `cargo xtask bench`.");
}
