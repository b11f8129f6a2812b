//! Small things written once and used everywhere: [`tool`] (external
//! commands). Uses nothing of kiln's.

pub mod tool;
