//! Creation options as qemu-img and the block layer's image creation
//! take them (QEMU: the QemuOpts of bdrv_img_create): a format's options
//! merged with its protocol's, `key=value` checked and typed, the list a
//! driver's create gets, and the `Formatting ...` line's option text.

use crate::driver::DriverClass;
use crate::options::{parse_size, OptSpec, OptType, Opts};

/// A creation option as the user set it: text as typed and value to pass on.
pub struct SetOpt {
    pub spec: OptSpec,
    pub typed: String,
    pub value: String,
}

/// The options set, as a driver's create or measure takes them.
pub fn opts_of(set: &[SetOpt]) -> Opts {
    let mut opts = Opts::new();
    for s in set {
        opts.insert(s.spec.name.to_string(), s.value.clone().into());
    }
    opts
}

/// The options of `fmt` followed by those of its protocol, without repeats.
pub fn merged_options(fmt: &dyn DriverClass, proto: Option<&dyn DriverClass>) -> Vec<OptSpec> {
    let mut v: Vec<OptSpec> = fmt.create_options().to_vec();
    if let Some(p) = proto {
        if p.name() != fmt.name() {
            for o in p.create_options() {
                if !v.iter().any(|x| x.name == o.name) {
                    v.push(*o);
                }
            }
        }
    }
    v
}

const SIZE_HELP: &str = "\nOptional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\nand exabytes, respectively.";

/// Checks and records `key=value` against the option list.
pub fn set_option(
    set: &mut Vec<SetOpt>,
    specs: &[OptSpec],
    key: &str,
    val: &str,
) -> Result<(), String> {
    let Some(spec) = specs.iter().find(|s| s.name == key) else {
        return Err(format!("Invalid parameter '{key}'"));
    };
    let value = match spec.ty {
        OptType::Size => parse_size(val, 1)
            .map_err(|_| {
                format!("Parameter '{key}' expects a non-negative number below 2^64{SIZE_HELP}")
            })?
            .to_string(),
        // As qemu_strtou64, a minus sign wraps: "-1" is 2^64 - 1.
        OptType::Number => match val.strip_prefix('-') {
            Some(n) => n.parse::<u64>().map(u64::wrapping_neg),
            None => val.parse::<u64>(),
        }
        .map_err(|_| format!("Parameter '{key}' expects a number"))?
        .to_string(),
        OptType::Bool => match val {
            "on" | "yes" | "true" | "y" => "on".to_string(),
            "off" | "no" | "false" | "n" => "off".to_string(),
            _ => return Err(format!("Parameter '{key}' expects 'on' or 'off'")),
        },
        OptType::Str => val.to_string(),
    };
    set.retain(|s| s.spec.name != key);
    set.push(SetOpt {
        spec: *spec,
        typed: val.to_string(),
        value,
    });
    Ok(())
}

/// The `Formatting` line's option list: every option set or defaulted, in list order.
pub fn print_opts(specs: &[OptSpec], set: &[SetOpt]) -> String {
    let mut parts = Vec::new();
    for spec in specs {
        match set.iter().find(|s| s.spec.name == spec.name) {
            Some(s) => {
                let shown = match spec.ty {
                    OptType::Size | OptType::Number => s.value.clone(),
                    OptType::Bool => s.typed.clone(),
                    OptType::Str => s.typed.replace(',', ",,"),
                };
                parts.push(format!("{}={shown}", spec.name));
            }
            None => {
                if let Some(d) = spec.default {
                    parts.push(format!("{}={d}", spec.name));
                }
            }
        }
    }
    parts.join(" ")
}
