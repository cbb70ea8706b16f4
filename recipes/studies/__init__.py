"""Studies: drivers that start recipe runs in subprocesses (:mod:`.jobs`), resume them, and
gather their evaluations into reports. They are no recipes themselves."""
