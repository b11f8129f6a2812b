//! `kiln flash`: write an image to a device or a file, verify it, print
//! the target written. The paranoia lives in `deliver::flash`.

use crate::deliver::flash::{self, FlashOptions, SysFacts};

/// Flash with the facts of this machine, then print the target on stdout.
pub fn run(opts: &FlashOptions) -> anyhow::Result<()> {
    let report = flash::flash(opts, &SysFacts::default())?;
    println!("{}", report.target.display());
    Ok(())
}
