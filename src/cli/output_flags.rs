//! The flags that say how a command reports, shared by every command that runs long enough to
//! show progress: JSON for machines instead of tables, and progress bars off.

#[derive(clap::Args, Debug, Clone, Default, PartialEq)]
#[command(next_help_heading = "Output")]
pub struct OutputFlags {
    /// Print the report as one JSON object on stdout instead of tables
    #[arg(long)]
    pub json: bool,
    /// No progress bars or progress lines (bars in a terminal, else a plain line every 15 s)
    #[arg(long, visible_alias = "quiet")]
    pub no_progress: bool,
}

impl OutputFlags {
    /// Whether to show progress. It goes to stderr, so it shows beside `--json` too: a
    /// pipeline that reads the report from stdout still sees a long run is alive.
    pub fn progress(&self) -> bool {
        !self.no_progress
    }
}
