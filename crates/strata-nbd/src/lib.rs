//! The NBD protocol (the NBD project's protocol document; QEMU's meta
//! contexts from its `docs/interop/nbd.rst`): a server that serves nodes
//! through user handles, and a client the `nbd` protocol driver wraps. It
//! knows no driver.

pub mod client;
pub mod listener;
pub mod proto;
pub mod server;

pub use server::export::{
    export_bitmaps, export_perms, BitmapRef, Export, ExportState, MetaContext,
};
pub use server::Server;
