//! The file system beneath the roots: how inputs are opened (`input`), how outputs are made
//! and published durably (`output`), the ACLs they carry from their inputs (`acl`), how
//! inputs are moved aside (`aside`), the locks that prove a temp's or a state directory's
//! owner alive (`lock`), filepipe's own directories and files known by identity (`own`), how
//! the roots it makes for them are made (`rootdirs`), and how a root is opened by its
//! canonical path (`canonical`). Every op, sink and source reaches files through these.

pub(crate) mod acl;
pub(crate) mod aside;
pub(crate) mod canonical;
pub(crate) mod input;
pub(crate) mod lock;
pub(crate) mod output;
pub(crate) mod own;
pub(crate) mod rootdirs;
