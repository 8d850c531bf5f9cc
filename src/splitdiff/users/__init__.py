"""Users axis: many users share one server phase, then each finishes on its own device."""
