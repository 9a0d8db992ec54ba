"""Our remote-code implementation of the MiniCPM-V <= 4.5 config, image processor and processor."""
