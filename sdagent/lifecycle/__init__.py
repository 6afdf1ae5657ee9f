"""The instance's life: IMDS and its notices, what each notice does, Auto Scaling, systemd."""
