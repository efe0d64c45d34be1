"""`rsg finetune`'s recipe: config (torch-free), data (pairs and the batch plan), loop (the explicit training loop
of one task) and run (the command's driver: tasks, run folder, prediction). Import the submodules directly: this
package imports nothing, so `config` stays torch-free."""
