//! The commands kiln tells users to run next, in one place, so each runs as
//! printed when pasted into a shell (every required flag present, quoted).
//! A test runs each of them through the `kiln` binary.

use crate::model::Version;

/// After a migration failed half-way and the database was fixed by hand.
pub fn repair(version: &Version) -> String {
    format!("kiln repair {version} --reason \"fixed by hand\"")
}

/// After a failed migration was completed by hand.
pub fn repair_mark_applied(version: &Version) -> String {
    format!("kiln repair {version} --mark-applied --reason \"completed by hand\"")
}

/// After an applied migration's file was edited on purpose.
pub fn accept_checksum(version: &Version) -> String {
    format!("kiln repair {version} --reason \"accept the edited file\"")
}

/// After an applied migration's file was deleted on purpose.
pub fn retire(version: &Version) -> String {
    format!("kiln retire {version} --reason \"file removed on purpose\"")
}
