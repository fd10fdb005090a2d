"""One recipe per stage (setup → train → save). Stages use the rest of the package; nothing imports a stage."""
