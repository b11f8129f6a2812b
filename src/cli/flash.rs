//! `kiln flash`: write an image to a device or a file, verify it, print
//! the target written. The paranoia lives in `deliver::flash`.

use crate::deliver::flash::{self, FlashOptions, SysFacts};
use crate::util::cancel::Cancel;

/// Flash with the facts of this machine, then print the target on stdout;
/// stop between writes when `cancel` is set.
pub fn run(opts: &FlashOptions, cancel: &Cancel) -> anyhow::Result<()> {
    let report = flash::flash_cancellable(opts, &SysFacts::default(), cancel)?;
    println!("{}", report.target.display());
    Ok(())
}
