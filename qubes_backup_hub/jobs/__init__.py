"""Jobs: what one command does end to end (VM-level backup, VM-level restore) across the
platform, the engine, the store and the safety layer."""
