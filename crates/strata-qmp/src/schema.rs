//! A QAPI schema in code: the types of command arguments and command-line
//! options, by name, as QEMU's qapi/*.json declare them. Types refer to
//! each other by name, so recursive types (a block node whose `file` is
//! another block node) need no special care.

use std::collections::HashMap;

/// A member of an object: `*name` in a spec marks it optional; the type is
/// a type name, or `[T]` for a list of T.
#[derive(Clone, Debug)]
pub struct Member {
    /// The member's name.
    pub name: String,
    /// The name of its type.
    pub ty: String,
    /// It may be left out.
    pub optional: bool,
}

/// A flat union's branches: the members the value of the discriminator
/// (an enum member of the base) adds.
#[derive(Clone, Debug)]
pub struct Branches {
    /// The discriminator member.
    pub tag: String,
    /// Per tag value, the name of the object type whose members it adds.
    pub variants: Vec<(String, String)>,
}

/// A type of the schema.
#[derive(Clone, Debug)]
pub enum TypeDef {
    /// One of a list of strings.
    Enum(Vec<String>),
    /// An object with members, and for a union the branch members.
    Object {
        members: Vec<Member>,
        branches: Option<Branches>,
    },
    /// One of several types, told apart by the JSON type of the value.
    Alternate(Vec<String>),
}

/// The built-in scalar types.
pub const BUILTINS: &[&str] = &[
    "str", "int", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "size",
    "number", "bool", "any", "null",
];

/// A set of named types.
#[derive(Clone, Debug, Default)]
pub struct Schema {
    types: HashMap<String, TypeDef>,
}

/// Parses `("*name", "type")` pairs into members.
pub fn members(spec: &[(&str, &str)]) -> Vec<Member> {
    spec.iter()
        .map(|(n, t)| Member {
            name: n.trim_start_matches('*').to_string(),
            ty: t.to_string(),
            optional: n.starts_with('*'),
        })
        .collect()
}

impl Schema {
    /// An empty schema.
    pub fn new() -> Schema {
        Schema::default()
    }

    /// Declares an enumeration.
    pub fn enumeration(&mut self, name: &str, values: &[&str]) -> &mut Self {
        let values = values.iter().map(|v| v.to_string()).collect();
        self.types.insert(name.into(), TypeDef::Enum(values));
        self
    }

    /// Declares an object type.
    pub fn object(&mut self, name: &str, spec: &[(&str, &str)]) -> &mut Self {
        self.types.insert(
            name.into(),
            TypeDef::Object {
                members: members(spec),
                branches: None,
            },
        );
        self
    }

    /// Declares a flat union: the base members, the discriminator among
    /// them, and the object type of each of its values.
    pub fn union(
        &mut self,
        name: &str,
        base: &[(&str, &str)],
        tag: &str,
        variants: &[(&str, &str)],
    ) -> &mut Self {
        let branches = Branches {
            tag: tag.into(),
            variants: variants
                .iter()
                .map(|(v, t)| (v.to_string(), t.to_string()))
                .collect(),
        };
        self.types.insert(
            name.into(),
            TypeDef::Object {
                members: members(base),
                branches: Some(branches),
            },
        );
        self
    }

    /// Declares an alternate of the named types.
    pub fn alternate(&mut self, name: &str, types: &[&str]) -> &mut Self {
        let types = types.iter().map(|t| t.to_string()).collect();
        self.types.insert(name.into(), TypeDef::Alternate(types));
        self
    }

    /// The definition of a declared type.
    pub fn get(&self, name: &str) -> Option<&TypeDef> {
        self.types.get(name)
    }

    /// Names used by members, alternates and unions that are neither
    /// declared nor built in (a schema with any is a bug).
    pub fn undefined(&self) -> Vec<String> {
        let known = |t: &str| {
            let t = t.trim_start_matches('[').trim_end_matches(']');
            BUILTINS.contains(&t) || self.types.contains_key(t)
        };
        let mut missing = Vec::new();
        for def in self.types.values() {
            let names: Vec<&str> = match def {
                TypeDef::Enum(_) => vec![],
                TypeDef::Object { members, branches } => members
                    .iter()
                    .map(|m| m.ty.as_str())
                    .chain(
                        branches
                            .iter()
                            .flat_map(|b| b.variants.iter().map(|v| v.1.as_str())),
                    )
                    .collect(),
                TypeDef::Alternate(ts) => ts.iter().map(String::as_str).collect(),
            };
            missing.extend(names.into_iter().filter(|t| !known(t)).map(String::from));
        }
        missing.sort();
        missing.dedup();
        missing
    }
}
