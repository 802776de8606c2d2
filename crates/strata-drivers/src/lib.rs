//! Strata's drivers: protocols (where bytes live) and formats (how they make a
//! disk). The tools build a [`strata_block::Registry`] from [`registry`].

pub mod filters;
pub mod formats;
pub mod protocols;

use std::sync::Arc;
use strata_block::Registry;

/// Every driver of this crate, registered; qcow2 before raw so that probing
/// sees the real formats first.
pub fn registry() -> Arc<Registry> {
    registry_with(Vec::new())
}

/// Every driver of this crate and `extra` after them (drivers of the
/// layers above, such as the jobs' filters).
pub fn registry_with(extra: Vec<Arc<dyn strata_block::DriverClass>>) -> Arc<Registry> {
    let mut r = Registry::default();
    r.register(Arc::new(protocols::file::FileClass::FILE));
    r.register(Arc::new(protocols::file::FileClass::HOST_DEVICE));
    r.register(Arc::new(protocols::file::FileClass::HOST_CDROM));
    r.register(Arc::new(protocols::nbd::NbdClass::NBD));
    r.register(Arc::new(protocols::nbd::NbdClass::TCP));
    r.register(Arc::new(protocols::nbd::NbdClass::UNIX));
    r.register(Arc::new(protocols::null::NullClass::CO));
    r.register(Arc::new(protocols::null::NullClass::AIO));
    r.register(Arc::new(strata_rbd::RbdClass));
    r.register(Arc::new(formats::qcow2::Qcow2Class));
    r.register(Arc::new(formats::luks::LuksClass));
    r.register(Arc::new(formats::vdi::VdiClass));
    r.register(Arc::new(formats::vpc::VpcClass));
    r.register(Arc::new(formats::qcow::QcowClass));
    r.register(Arc::new(filters::blkdebug::BlkdebugClass));
    r.register(Arc::new(filters::blklogwrites::BlkLogWritesClass));
    r.register(Arc::new(filters::blkverify::BlkverifyClass));
    r.register(Arc::new(filters::copy_on_read::CopyOnReadClass));
    r.register(Arc::new(filters::compress::CompressClass));
    r.register(Arc::new(filters::throttle::ThrottleClass));
    r.register(Arc::new(filters::quorum::QuorumClass));
    r.register(Arc::new(formats::raw::RawClass));
    for c in extra {
        r.register(c);
    }
    Arc::new(r)
}
