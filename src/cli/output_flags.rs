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
    /// Whether to draw progress bars: never beside JSON, whose readers want stdout alone.
    pub fn progress(&self) -> bool {
        !self.json && !self.no_progress
    }
}
