"""Pictures and pages built from run-directory files alone."""
