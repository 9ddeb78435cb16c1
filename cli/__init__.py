"""ngcal.cli: the one `ngcal` command; the only code that knows every part."""
