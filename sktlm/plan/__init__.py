"""Planning a configuration for target chips before paying for them: `sktlm plan`.
"""
