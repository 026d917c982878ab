"""Training recipes (YAML); a package only so that installs ship the files."""
