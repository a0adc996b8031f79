"""The TextDiff MONAI Label app's own package: thin wiring of the `textdiff` library into MONAI Label."""
