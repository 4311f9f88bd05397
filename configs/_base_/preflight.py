# The plugin's runner (mmgroupmamba/runner.py): before anything is built it checks the data, the weights and the
# device, and reports what is missing with the fix. A config's `missing_data_help` is its word on its own data.
custom_imports = dict(imports=['mmgroupmamba'], allow_failed_imports=False)
runner_type = 'PreflightRunner'
