pub struct Qcow2Class;
