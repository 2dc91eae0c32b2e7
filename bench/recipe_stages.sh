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

# `side_by_side LABEL_A FUNCTION_A LABEL_B FUNCTION_B`: run two independent stages at once, one process each (their
# output interleaves, each line prefixed with its label); stops the recipe if either fails.
side_by_side() {
    "$2" > >(sed -u "s/^/[$1] /") 2>&1 &
    local first=$!
    "$4" > >(sed -u "s/^/[$3] /") 2>&1 &
    local second=$!
    wait $first || { echo "$1 failed" >&2; kill $second 2>/dev/null; exit 1; }
    wait $second || { echo "$3 failed" >&2; exit 1; }
    echo "=== $1 and $3 done (total $((SECONDS - started)) s)"
}
