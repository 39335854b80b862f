#!/bin/sh
# Container entrypoint of the hpr-serve image.
#   (no arguments) / flags only   → hpr-serve [flags]   (settings also from HPR_* environment variables)
#   any other command             → run it as is        (hpr-train run --out /runs/x, bash, python, ...)
# Adapter discovery: unless adapters are named explicitly (HPR_ADAPTER or --adapter), every checkpoint directory
# found directly under the directories of $HPR_ADAPTERS_DIR (':'-separated; the image sets /adapters:/runs) is
# served under its directory name: DIR/NAME/hpr_config.json (ours), DIR/NAME/guidance_config.json or
# guidance.safetensors (the seed's), or DIR/NAME/checkpoint/... (an `hpr-train run --out DIR/NAME` directory).
# HPR_ADAPTERS_DIR= (empty) turns discovery off.
set -eu

is_checkpoint() {
    [ -f "$1/hpr_config.json" ] || [ -f "$1/guidance_config.json" ] || [ -f "$1/guidance.safetensors" ]
}

names_adapter() {
    for arg in "$@"; do
        case "$arg" in --adapter | --adapter=*) return 0 ;; esac
    done
    return 1
}

if [ $# -eq 0 ] || [ "${1#-}" != "$1" ]; then
    set -- hpr-serve "$@"
fi

if [ "$1" = hpr-serve ] && [ -z "${HPR_ADAPTER:-}" ] && ! names_adapter "$@"; then
    dirs=${HPR_ADAPTERS_DIR-/adapters:/runs}
    old_ifs=$IFS
    IFS=:
    for dir in $dirs; do
        IFS=$old_ifs
        if [ -z "$dir" ] || [ ! -d "$dir" ]; then continue; fi
        for entry in "$dir"/*; do
            [ -d "$entry" ] || continue
            name=$(basename "$entry")
            if is_checkpoint "$entry"; then
                path=$entry
            elif is_checkpoint "$entry/checkpoint"; then
                path=$entry/checkpoint
            else
                echo "hpr-entrypoint: skipping $entry (no hpr_config.json, guidance_config.json or checkpoint/)" >&2
                continue
            fi
            echo "hpr-entrypoint: serving adapter '$name' from $path" >&2
            set -- "$@" --adapter "$name=$path"
        done
    done
    IFS=$old_ifs
fi

exec "$@"
