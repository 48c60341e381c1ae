"""Built-in TOML recipes (installed as fastmim.recipes); see README "Configuration"."""
