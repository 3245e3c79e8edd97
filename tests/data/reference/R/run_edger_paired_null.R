# edgeR QL on a paired null pseudobulk where glmQLFit(robust = TRUE) gives an infinite prior df for many genes.
# Usage: Rscript run_edger_paired_null.R DIR   (reads DIR/counts.csv and DIR/samples.csv, writes DIR/pb_edgeR_QL.csv)
# The same calls as run_pseudobulk.R (filterByExpr, calcNormFactors, estimateDisp, glmQLFit robust, glmQLFTest),
# design ~ donor + condition; logFC on the natural-log scale.
suppressPackageStartupMessages(library(edgeR))
dir <- commandArgs(TRUE)[1]
counts <- as.matrix(read.csv(file.path(dir, "counts.csv"), row.names = 1, check.names = FALSE))
cd <- read.csv(file.path(dir, "samples.csv"), row.names = 1)
cd$donor <- factor(cd$donor)
cd$condition <- factor(cd$condition, levels = c("ctrl", "case"))
stopifnot(identical(rownames(cd), colnames(counts)))
design <- model.matrix(~ donor + condition, cd)
y <- DGEList(counts); keep <- filterByExpr(y, design); y <- calcNormFactors(y[keep, , keep.lib.sizes = FALSE])
y <- estimateDisp(y, design); fit <- glmQLFit(y, design, robust = TRUE)
tt <- glmQLFTest(fit, coef = "conditioncase")$table
out <- data.frame(gene = rownames(tt), logFC = tt$logFC * log(2), F = tt$F, pvalue = tt$PValue,
                  df_prior = fit$df.prior, s2_post = fit$var.post, trended_dispersion = y$trended.dispersion)
write.csv(out, file.path(dir, "pb_edgeR_QL.csv"), row.names = FALSE, quote = FALSE)
cat("genes tested:", nrow(out), " infinite df.prior:", sum(is.infinite(fit$df.prior)), "\n")
