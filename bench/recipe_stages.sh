# Sourced by the bench/*_recipe.sh scripts: `stage NAME COMMAND...` runs COMMAND and prints its wall time and the
# recipe's total so far (counted from where this file is sourced).
started=$SECONDS
stage() {
    local name=$1 begin=$SECONDS
    shift
    echo
    echo "=== ${name}"
    "$@"
    echo "=== ${name}: $((SECONDS - begin)) s (total $((SECONDS - started)) s)"
}
