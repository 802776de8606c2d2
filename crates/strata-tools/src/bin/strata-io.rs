fn main() {
    std::process::exit(strata_tools::io::main());
}
