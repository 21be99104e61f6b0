"""``longrope-factors``: the command line of the factor tools."""
