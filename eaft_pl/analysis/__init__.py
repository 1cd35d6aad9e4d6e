"""Looking at data and runs: the (p, H) statistics, ``eaft-pl analyze``, ``eaft-pl compare``, the
prediction writer and the figures."""
