fn main() {
    std::process::exit(strata_tools::img::main());
}
