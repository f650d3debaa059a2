"""BART and mBART families for encdec (registered through the ``encdec`` entry point ``bart``)."""
