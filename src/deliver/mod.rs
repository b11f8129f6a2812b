//! Getting images onto machines: `flash` (a stick or disk), `serve`
//! (netboot and update bundles over HTTP), `upgrade` (profile edits and
//! rollout plans). Uses image, inputs, render, config and util; never
//! build or verify.

pub mod flash;
pub mod relay;
pub mod serve;
pub mod upgrade;
